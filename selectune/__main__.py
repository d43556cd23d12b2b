"""`python -m selectune ...` (also what `torchrun -m selectune` runs)."""

from selectune.cli import main

if __name__ == "__main__":
    main()
