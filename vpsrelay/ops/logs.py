"""Log formatting: logfmt (the default), JSON or plain text; secrets scrubbed from all.

Access-log records carry their fields (`record.fields`); other records are
application logs with a message. Every field value passes `logline.redact`, so
a credential that slipped into a message (an exception text, a URL) is masked.
Every line names the process that wrote it (`worker=w1`, `w2`, ...; `main` for the
single process of `workers = 1`, and for the supervisor of the workers).
"""

from __future__ import annotations

import logging
import sys
import time

from vpsrelay import worker_identity
from vpsrelay.core import logline

FORMATS = ("logfmt", "json", "text")


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class StructuredFormatter(logging.Formatter):
    """One line per record in `logfmt` or `json`."""

    def __init__(self, style: str = "logfmt") -> None:
        super().__init__()
        self.style_name = style
        self.worker = worker_identity.current().label

    def format(self, record: logging.LogRecord) -> str:
        head: list[logline.Field] = [
            ("ts", _timestamp(record)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("worker", self.worker),
        ]
        fields = getattr(record, "fields", None)
        if isinstance(fields, list):
            body: list[logline.Field] = fields
        else:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
            body = [("msg", message)]
        # Scrub each value before rendering: scrubbing a rendered JSON line could cut
        # through its escapes and leave a line that no longer parses.
        everything = [
            (key, logline.redact(value) if isinstance(value, str) else value)
            for key, value in head + body
        ]
        if self.style_name == "json":
            return logline.as_json(everything)
        return logline.logfmt(everything)


class RedactingFormatter(logging.Formatter):
    """The plain-text format, scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        return logline.redact(super().format(record))


def formatter(style: str) -> logging.Formatter:
    if style == "text":
        worker = worker_identity.current().label
        return RedactingFormatter(f"%(asctime)s %(levelname)s %(name)s [{worker}] %(message)s")
    return StructuredFormatter(style)


def setup(level: str, style: str = "logfmt") -> None:
    """Log to stderr at `level` in `style`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(style))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO; the access log already has them.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # httpcore's proxy traces print a proxy's credentials at DEBUG: never below INFO.
    for name in ("httpcore.socks", "httpcore.proxy"):
        logging.getLogger(name).setLevel(logging.INFO)
    # botocore (the bucket's signer) logs each signature at DEBUG, and a presigned URL's
    # signature is that URL's credential: never below INFO either.
    logging.getLogger("botocore").setLevel(logging.INFO)
