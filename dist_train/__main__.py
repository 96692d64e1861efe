"""`python -m dist_train COMMAND ...`: the `dist-train` console command (dist_train/launcher.py)."""

from dist_train.launcher import entry

if __name__ == "__main__":
    entry()
