"""`make test` runs the suite on two pytest-xdist workers, one test file per worker at a time (`--dist loadfile`).
Files are handed out in collection order, so the slow ones go first: the end-to-end `dvc repro` file alone takes
most of the run, and the other worker gets through everything else meanwhile."""


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: each file keeps its order
