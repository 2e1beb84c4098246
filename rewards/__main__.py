"""``python -m rewards``: run the rewards service (same as ``kessai rewards``)."""

from rewards.service import main

if __name__ == "__main__":
    main()
