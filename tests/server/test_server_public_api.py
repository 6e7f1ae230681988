"""``klockwork.server.__all__`` is the server's public API: pinned, so changes are deliberate."""

from __future__ import annotations

import subprocess
import sys

import klockwork.server
from klockwork.server import keys


def test_the_public_names_are_pinned_and_importable() -> None:
    assert sorted(klockwork.server.__all__) == ["ApiKey", "ApiKeys", "ServerSettings", "create_app"]
    for name in klockwork.server.__all__:
        assert getattr(klockwork.server, name) is not None
    assert sorted(keys.__all__) == ["ApiKey", "ApiKeys", "KeyInfo", "ROLES", "Role"]


def test_the_keys_need_no_web_framework() -> None:
    # `klockwork keys` runs where the server extra is not installed.
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['starlette'] = None\n"
        "from klockwork.server import ApiKeys\n"
        "from klockwork import Klockwork\n"
        "kw = Klockwork(); record, secret = ApiKeys(kw).create('bob', 'approver')\n"
        "assert ApiKeys(kw).authenticate(secret) == record\n"
        "try:\n"
        "    from klockwork.server import create_app\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
