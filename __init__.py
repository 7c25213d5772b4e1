"""Not part of the package (that is minirl/minirl/). This file makes the cloned repository's
own folder refuse to be imported as `minirl`.

When Python runs from the folder that contains the clone (say ~/code, holding ~/code/minirl),
the current folder comes first on sys.path. Without this file the clone's folder, which has no
__init__.py, would be imported as an empty namespace package whenever no regular `minirl` is
found on sys.path: that is the case with `pip install -e .` (setuptools' editable finder is
consulted only after the path search, which returns the namespace package) and without any
install, and `minirl.load_model` fails with "module 'minirl' has no attribute 'load_model'".
With this file the clone's folder is a regular package instead, and importing it says why.
(A non-editable install is shadowed the same way: Python always prefers the current folder.)
Imported under any other name (a clone named minirl-main, test collectors), it does nothing.
"""
import os

if __name__ == "minirl":
    _here = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(
        f"'import minirl' found the cloned repository's folder {_here}, not the package inside "
        f"it, because Python runs from {os.path.dirname(_here)}; run from inside the clone "
        f"(cd {_here}) or from any other folder")
