"""The HTML page's element builder: every value is escaped for where it goes unless it is markup this module
made, so a render function cannot forget to escape.

Leaderboards come from other people's CI and task files from colleagues: any string in them (a task, a
backbone, a label, an attribute or group name, provenance) may be hostile. Contexts:

* **text** (children of an element): ``& < >`` escaped; a :class:`Markup` child is inserted as it is, and
  only this module makes :class:`Markup`;
* **attributes**: names are fixed by the code (``[a-z][a-z0-9-]*``, never ``on*`` or ``style``), values
  are quoted and escaped (``& < > " '``);
* **URLs** (``href``, ``src``): a fragment (``#view=shift``) or a PNG this page embeds
  (``data:image/png;base64,...``); anything else (``javascript:``, remote URLs) is refused;
* **inline JSON** (:func:`json_script`): a data block whose ``<``, ``>``, ``&`` and line separators are
  ``\\u`` escapes, so a string cannot close the script element;
* **the page's own script** (:func:`page`): a constant, allowed by its sha256 in the page's
  Content-Security-Policy, which also forbids every other script (inline handlers included), every
  remote load, forms and ``<base>``;
* **SVG** from matplotlib (:func:`svg`): parsed as XML and checked against an allow-list (no script,
  foreign content, links out, event attributes), comments and metadata dropped, re-serialised.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html import escape
from typing import Any, Iterable

#: elements without a closing tag
_VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_URL_ATTRIBUTES = frozenset({"href", "src"})
_PNG_DATA_URL = re.compile(r"^data:image/png;base64,[A-Za-z0-9+/\s]*={0,2}\s*$")  # matplotlib wraps lines


class Markup(str):
    """HTML this module made: inserted as it is. Never construct it from outside data."""

    __slots__ = ()


def text(value: Any) -> Markup:
    """``value`` as HTML text (``None`` is empty)."""
    if isinstance(value, Markup):
        return value
    return Markup(escape("" if value is None else str(value), quote=True))


def safe_url(value: str) -> str:
    """A URL this page may use: a fragment, or a PNG it embeds; anything else raises ``ValueError``."""
    if value.startswith("#") or _PNG_DATA_URL.match(value):
        return value
    raise ValueError(f"URL not allowed in the page: {value[:60]!r}")


def _attributes(attrs: dict[str, Any] | None) -> str:
    out = []
    for name, value in (attrs or {}).items():
        if not _NAME.match(name) or name.startswith("on") or name == "style":
            raise ValueError(f"attribute {name!r} is not allowed by the page builder")
        if value is None or value is False:
            continue
        if value is True:
            out.append(f" {name}")
            continue
        value = str(value)
        if name in _URL_ATTRIBUTES:
            value = safe_url(value)
        out.append(f' {name}="{escape(value, quote=True)}"')
    return "".join(out)


def _children(children: Iterable[Any]) -> Iterable[str]:
    for child in children:
        if child is None:
            continue
        if isinstance(child, (list, tuple)):
            yield from _children(child)
        else:
            yield text(child)


def el(tag: str, attrs: dict[str, Any] | None = None, *children: Any) -> Markup:
    """``<tag attrs>children</tag>``: attribute values and non-:class:`Markup` children escaped."""
    if not _NAME.match(tag) or tag in ("script", "style"):
        raise ValueError(f"element {tag!r} is not made by el() (see page() and json_script())")
    opening = f"<{tag}{_attributes(attrs)}>"
    if tag in _VOID:
        if children:
            raise ValueError(f"<{tag}> has no children")
        return Markup(opening)
    return Markup(opening + "".join(_children(children)) + f"</{tag}>")


def fragment(*children: Any) -> Markup:
    """Several children as one piece of markup (escaped like :func:`el`'s)."""
    return Markup("".join(_children(children)))


def json_script(element_id: str, data: Any) -> Markup:
    """``<script type="application/json" id=...>``: data for the page, never run; no string in it can end
    the element or start a comment (``<``, ``>``, ``&``, U+2028, U+2029 are ``\\u`` escapes)."""
    payload = json.dumps(data, ensure_ascii=False, sort_keys=False, default=str)
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                       ("\u2029", "\\u2029")):
        payload = payload.replace(char, code)
    return Markup(f'<script type="application/json"{_attributes({"id": element_id})}>{payload}</script>')


def csp(script: str) -> str:
    """The page's Content-Security-Policy: only ``script`` (by its sha256) runs; images only as data URLs;
    styles inline (the page's and the SVG plots'); nothing is fetched, no form, no ``<base>``."""
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return ("default-src 'none'; script-src 'sha256-" + digest + "'; img-src data:; style-src 'unsafe-inline'; "
            "base-uri 'none'; form-action 'none'")


def page(title: Any, css: str, body: Any, script: str, lang: str = "en") -> str:
    """The whole document. ``css`` and ``script`` are the module constants of the renderer (never data):
    they must not be able to end their own elements."""
    if "</style" in css.lower() or "</script" in script.lower() or "<!--" in script:
        raise ValueError("the page's own CSS or script would end its element")
    head = (Markup('<meta charset="utf-8">')
            + el("meta", {"http-equiv": "Content-Security-Policy", "content": csp(script)})
            + el("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"})
            + el("meta", {"name": "referrer", "content": "no-referrer"})
            + el("title", None, title) + Markup(f"<style>{css}</style>"))
    return (f"<!DOCTYPE html><html{_attributes({'lang': lang})}><head>{head}</head>"
            f"<body>{text(body)}<script>{script}</script></body></html>\n")


# --------------------------------------------------------------------------- SVG from matplotlib

_SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_NS = "http://www.w3.org/1999/xlink"
#: SVG elements matplotlib writes for the plots; anything else (script, foreignObject, a, animate, set,
#: use of remote resources, ...) is refused
_SVG_ELEMENTS = frozenset({"svg", "g", "defs", "style", "path", "rect", "circle", "ellipse", "line", "polyline",
                           "polygon", "text", "tspan", "clipPath", "use", "image", "title", "desc", "linearGradient",
                           "radialGradient", "stop", "pattern", "mask", "symbol", "marker"})
_DROPPED = frozenset({"metadata"})


def svg(source: str, attrs: dict[str, Any]) -> Markup:
    """A matplotlib SVG (``savefig(format="svg")``) made safe to inline, with ``attrs`` on its root.

    Parsed as XML (the XML prolog and doctype removed first; no entity is fetched), every element must be
    one of the plot elements (:data:`_SVG_ELEMENTS`), no attribute may be an event handler, and links
    (``href``/``xlink:href``) may only point inside the document (``#id``) or to an embedded PNG.
    Metadata and comments are dropped. Plot text that matplotlib escaped stays text.
    """
    import xml.etree.ElementTree as ET

    start = source.find("<svg")
    if start < 0:
        raise ValueError("not an SVG document")
    root = ET.fromstring(source[start:])
    for parent in list(root.iter()):
        for child in list(parent):
            if _local(child.tag) in _DROPPED:
                parent.remove(child)
    for node in root.iter():
        if not isinstance(node.tag, str) or not node.tag.startswith("{" + _SVG_NS + "}") \
                or _local(node.tag) not in _SVG_ELEMENTS:
            raise ValueError(f"SVG element {node.tag!r} is not allowed in the page")
        for name, value in node.attrib.items():
            local = _local(name)
            if local.lower().startswith("on"):
                raise ValueError(f"SVG attribute {local!r} is not allowed in the page")
            if local == "href":
                safe_url(value)
    for name, value in attrs.items():
        if not _NAME.match(name) or name.startswith("on") or name == "style":
            raise ValueError(f"attribute {name!r} is not allowed by the page builder")
        if value is not None:
            root.set(name, str(value))
    ET.register_namespace("", _SVG_NS)
    ET.register_namespace("xlink", _XLINK_NS)
    return Markup(ET.tostring(root, encoding="unicode"))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
