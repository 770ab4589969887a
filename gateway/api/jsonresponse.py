"""The JSON response every handler uses: Starlette's, made unable to fail on content.

Starlette encodes JSON as UTF-8 text, which fails on a string holding a lone surrogate. Request
bodies with one are refused at the edge (``bodies.parse_json``), but a record written before
that check, or a name from any other source, must still not turn a reply into a 500: such
content falls back to ASCII escapes (``"\\ud800"``), which is valid JSON.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse as _StarletteJSONResponse


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
