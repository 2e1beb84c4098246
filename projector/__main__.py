"""``python -m projector``: run the projector (same as ``kessai projector``)."""

from projector.service import main

if __name__ == "__main__":
    main()
