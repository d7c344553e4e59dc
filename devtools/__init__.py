"""Development tools for the tests and the benchmarks; not part of the served package.

``medgemma/`` is what ships (the wheel and the Bento include only it); nothing in it or in ``service.py`` may import
from here (tests/unit/test_layering.py checks it).
"""

from __future__ import annotations
