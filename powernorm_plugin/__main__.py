"""``python -m powernorm_plugin --user-dir`` (or the ``powernorm-user-dir`` command) prints the
folder to give fairseq's ``--user-dir``."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m powernorm_plugin",
        description="Helpers for using powernorm_plugin with fairseq.",
    )
    parser.add_argument(
        "--user-dir",
        action="store_true",
        help="print the path to pass to fairseq's --user-dir and exit",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.user_dir:
        return print_user_dir()
    elif args.version:
        from . import __version__

        print(__version__)
    else:
        parser.print_help()
        return 2
    return 0


def print_user_dir():
    """The ``powernorm-user-dir`` command: print the folder to give fairseq's ``--user-dir``."""
    from . import USER_DIR

    print(USER_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
