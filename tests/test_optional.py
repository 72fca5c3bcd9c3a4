"""Tests for hf_whisper_kdq.optional: a missing optional dependency names the command that installs it."""

from __future__ import annotations

import pytest

from hf_whisper_kdq.optional import EXPORT_INSTALL_HINT, import_optional


def test_import_optional_imports_or_names_the_install_command():
    assert import_optional("json", "json").dumps([]) == "[]"
    with pytest.raises(ImportError, match="no-such-package is not installed") as caught:
        import_optional("hf_whisper_kdq_no_such_module", "no-such-package")
    assert EXPORT_INSTALL_HINT in str(caught.value) and isinstance(caught.value.__cause__, ImportError)


def test_lora_student_without_peft_names_the_install_command(tmp_path, monkeypatch):
    import sys

    from conftest import make_micro_rows, make_micro_whisper, micro_collate, micro_training_args

    import hf_whisper_kdq
    from hf_whisper_kdq import DistillQuantTrainer
    from hf_whisper_kdq.optional import PEFT_INSTALL_HINT

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError, as when it is not installed
    # Imported afresh even after other tests imported it (``from . import`` reads the package's attribute first).
    monkeypatch.delitem(sys.modules, "hf_whisper_kdq.peft_students", raising=False)
    monkeypatch.delitem(vars(hf_whisper_kdq), "peft_students", raising=False)  # no __getattr__: it would import it
    with pytest.raises(ImportError, match="peft is not installed") as caught:
        DistillQuantTrainer(
            model=make_micro_whisper(seed=1),
            teacher_model=make_micro_whisper(),
            args=micro_training_args(tmp_path, lora_r=4),
            train_dataset=make_micro_rows(4),
            data_collator=micro_collate,
        )
    assert PEFT_INSTALL_HINT in str(caught.value)
