"""Tests for hf_whisper_kdq.optional: a missing optional dependency names the command that installs it."""

from __future__ import annotations

import pytest

from hf_whisper_kdq.optional import EXPORT_INSTALL_HINT, import_optional


def test_import_optional_imports_or_names_the_install_command():
    assert import_optional("json", "json").dumps([]) == "[]"
    with pytest.raises(ImportError, match="no-such-package is not installed") as caught:
        import_optional("hf_whisper_kdq_no_such_module", "no-such-package")
    assert EXPORT_INSTALL_HINT in str(caught.value) and isinstance(caught.value.__cause__, ImportError)
