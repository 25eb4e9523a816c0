"""``GET /``: the chat page, one self-contained HTML file shipped with cnllm (``static/chat.html``).

The page itself needs no API key (it holds no data; its calls to ``/v1/`` carry the key the user types in) but goes
through the same Host check as every route. Its Content-Security-Policy lets it talk to this server only.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = Path(__file__).resolve().parent.parent / "static" / "chat.html"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=1)
def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page():
    return HTMLResponse(page_html(), headers=SECURITY_HEADERS)
