"""MedGemma served with BentoML: engine, API schemas and lifecycle, free of BentoML where possible.

Only ``service.py`` and its helpers ``medgemma.transport`` and ``medgemma.bentoml_compat`` know about BentoML;
everything else here is plain Python, transformers and torch, so it can be tested and reused on its own.
"""

from __future__ import annotations

__version__ = "0.1.0"
