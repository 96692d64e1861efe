"""The suite's own scheduling under pytest-xdist (tests/conftest.py): the DDP launches share one
worker, every other test keeps to its module."""

from __future__ import annotations

from conftest import ranks_tests, xdist_scope, ROOT


def test_every_test_marked_ranks_is_scheduled_with_the_launches_and_no_other(request):
    """The scheduler reads the marks from the sources (the xdist controller imports no test
    module); it must agree with the marks pytest itself sees, for every collected test."""
    items = request.session.items
    assert len(items) > 1
    for item in items:
        marked = item.get_closest_marker("ranks") is not None
        scope = xdist_scope(item.nodeid)
        assert (scope == "ranks") == marked, item.nodeid
        if not marked:
            assert scope == item.nodeid.split("::")[0]


def test_scope_of_a_parametrized_launch_and_of_a_plain_test():
    assert "test_signal_checkpoints_and_resume_continues" in ranks_tests(ROOT / "tests" / "test_robust.py")
    assert xdist_scope("tests/test_robust.py::test_signal_checkpoints_and_resume_continues[group-SIGTERM-0]") == "ranks"
    assert xdist_scope("tests/test_robust.py::test_bad_flags_are_one_line[x]") == "tests/test_robust.py"
    assert xdist_scope("tests/test_umask.py::test_umask_reads_the_process_umask[18]") == "tests/test_umask.py"
    assert ranks_tests(ROOT / "tests" / "no_such_file.py") == frozenset()
