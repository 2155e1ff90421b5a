"""`python -m bench [--quick] [...]`: see `bench.compare_llama` for the options."""

from .compare_llama import main


if __name__ == "__main__":
    main()
