"""The landing page at `/`: what this relay is and how to use it, for this relay.

Server-rendered from `templates/landing.html` (package data) with `string.Template`;
every inserted value is HTML-escaped. No external asset: users of a relay may not
reach a CDN. A strict Content-Security-Policy with a per-response nonce allows the
page's own style and copy-button script and nothing else, so the page cannot make
a request to any other host.
"""

from __future__ import annotations

import html
import secrets
from functools import cache
from importlib import resources
from string import Template
from typing import TYPE_CHECKING

from vpsrelay import __version__
from vpsrelay.core import snippets

if TYPE_CHECKING:
    from vpsrelay.config import Settings
    from vpsrelay.core.ratelimit import RateLimit

FORMAT_TITLES = {
    "docker": "Docker",
    "containerd": "containerd",
    "k3s": "k3s / RKE2",
    "podman": "podman / CRI-O",
    "nas": "NAS (Synology, QNAP)",
}
NOT_FOUND = b"404 page not found\n"


@cache
def _template() -> Template:
    text = resources.files("vpsrelay.ops").joinpath("templates/landing.html").read_text("utf-8")
    return Template(text)


def content_security_policy(nonce: str, *, download_form: bool = False) -> str:
    # The download form is the page's only form, and it submits to this relay.
    form_action = "'self'" if download_form else "'none'"
    return (
        f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        f"img-src 'self'; connect-src 'self'; base-uri 'none'; form-action {form_action}; "
        "frame-ancestors 'none'"
    )


def download_form(settings: Settings, where: snippets.Target) -> str:
    """The form that downloads an image as a tar (empty when downloads are off)."""
    if not settings.download.enabled:
        return ""
    e = html.escape
    user = " -u USER" if where.login_required else ""
    example = f"{where.url}/download?image=alpine%3Alatest&platform=linux%2Famd64"
    return f"""<h2 id="download">Download an image as a file</h2>
<p>For machines that cannot use a mirror: a tar that <code>docker load</code> and
<code>podman load</code> take. Interrupted downloads resume.</p>
<form class="download" method="get" action="/download">
<label>Image <input name="image" id="download-image" value="alpine:latest" required
 maxlength="400" autocomplete="off" spellcheck="false"></label>
<label>Platform <input name="platform" id="download-platform" value="linux/amd64"
 maxlength="60" autocomplete="off" spellcheck="false"></label>
<button type="submit" id="download-button">Download</button>
</form>
<div class="snippet">
<div class="path">the same with curl (<code>-C -</code> resumes, but cannot tell whether
 the tag moved meanwhile: name a digest, or use <code>vpsrelay save</code>)</div>
<button class="copy" type="button" data-copy="download-curl" hidden>Copy</button>
<pre id="download-curl" data-url="{e(where.url)}" data-user="{e(user)}">\
curl{e(user)} -C - -o alpine_latest.tar '{e(example)}'</pre>
</div>
<p class="muted">Or from a client machine with vpsrelay installed:
<code>vpsrelay save alpine:latest -o alpine.tar --relay {e(where.url)}</code>
(progress bar, resumes a partial file). At most {settings.download.max_images} images a
tar.</p>"""


def login_required(settings: Settings) -> bool:
    """Whether pulling needs `docker login` (access control, issue 5, sets `auth.enabled`)."""
    section = getattr(settings, "auth", None)
    return bool(getattr(section, "enabled", False))


def target(settings: Settings, base_url: str) -> snippets.Target:
    return snippets.Target(
        url=(settings.server.public_url or base_url).rstrip("/"),
        registries=tuple(r.name for r in settings.registries),
        login_required=login_required(settings),
    )


def render(settings: Settings, base_url: str, budgets: dict[str, RateLimit]) -> tuple[bytes, str]:
    """(the page, its Content-Security-Policy)."""
    nonce = secrets.token_urlsafe(16)
    where = target(settings, base_url)
    e = html.escape
    sections = []
    nav = []
    for fmt in snippets.FORMATS:
        nav.append(f'<a href="#{fmt}">{e(FORMAT_TITLES[fmt])}</a>')
        parts = [f'<h2 id="{fmt}">{e(FORMAT_TITLES[fmt])}</h2>']
        for item in snippets.snippets(where, (fmt,)):
            parts.append(f"<h3>{e(item.title)}</h3>")
            parts.append('<div class="snippet">')
            parts.append(f'<div class="path">{e(item.path) if item.path else "&nbsp;"}</div>')
            parts.append(
                f'<button class="copy" type="button" data-copy="{e(item.key)}" hidden>Copy</button>'
            )
            parts.append(
                f'<pre id="{e(item.key)}" data-lang="{e(item.language)}">{e(item.text)}</pre>'
            )
            parts.append("</div>")
        sections.append("\n".join(parts))
    if settings.download.enabled:
        nav.append('<a href="#download">Download as a file</a>')
    login = ""
    if where.login_required:
        login = (
            '<p class="notice">Access control is on: log in first with '
            f"<code>docker login {e(where.host)}</code> (or <code>podman login</code>, "
            "or the credentials in your engine's registry settings).</p>"
        )
    budget_items = []
    for registry, budget in budgets.items():
        if budget.remaining is None and budget.limit is None:
            continue
        window = (
            f" per {budget.window_seconds // 3600} h"
            if budget.window_seconds and budget.window_seconds % 3600 == 0
            else ""
        )
        text = (
            f"{registry} pull budget: {'?' if budget.remaining is None else budget.remaining}"
            f" of {'?' if budget.limit is None else budget.limit}{window} left"
        )
        budget_items.append(f"<li>{e(text)}</li>")
    page = _template().substitute(
        host=e(where.host),
        url=e(where.url),
        nonce=nonce,
        registries=e(", ".join(where.registries)),
        access="login required" if where.login_required else "anonymous pulls",
        budget="\n".join(budget_items),
        login=login,
        nav="".join(nav),
        sections="\n".join(sections),
        version=e(__version__),
        download=download_form(settings, where),
    )
    csp = content_security_policy(nonce, download_form=settings.download.enabled)
    return page.encode("utf-8"), csp
