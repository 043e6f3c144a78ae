"""Checks of the ``--output`` path the plugin's checkpoint and plot tools write."""
import os


def check_output(parser, output, inputs=()):
    """Refuse (``parser.error``, exit status 2) an ``--output`` that is a directory, lies in a
    folder that does not exist, or is one of ``inputs`` under another name (a symbolic link,
    ``./``, ``..``): writing it would replace a file the tool reads."""
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        parser.error(f"--output {output} is a directory; give a file name")
    if not os.path.isdir(folder):
        parser.error(f"--output {output}: folder {folder} does not exist")
    target = os.path.realpath(output)
    for path in inputs:
        if os.path.realpath(path) == target:
            parser.error(f"--output {output} is the input {path}: write the result elsewhere "
                         "and keep the file it was made from")
