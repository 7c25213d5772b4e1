"""minirl.kernels is the repository's top-level kernels/ folder (read its __init__.py).

setup.py installs that folder as the package minirl.kernels, so nothing named `kernels`
lands at the top level of site-packages (where Hugging Face's own `kernels` package, which
transformers uses, lives). This file makes the same import work from a source checkout:
it points the package at that folder. It is not installed (setup.py maps minirl.kernels
to kernels/ itself)."""
import os

__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "kernels")]
