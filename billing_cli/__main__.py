"""``python -m billing_cli``: the same CLI as the ``billing`` console script."""

from billing_cli.cli.app import main

if __name__ == "__main__":
    main()
