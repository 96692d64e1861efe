"""Synthetic competition data: `python -m dist_train.synth --out DIR [--persons N] [--size PX]`.

The generator belongs to the mask task (`dist_train.tasks.mask.synth`); this is its command.
"""

from dist_train.tasks.mask.synth import main

if __name__ == "__main__":
    main()
