"""The tiny-model factories are a public library module (vlpeft.models.tiny, vlpeft.models.tiny.twins) that does
not need the test helpers; vlpeft.testing keeps the former import paths as the very same objects."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import vlpeft.models.tiny as tiny
import vlpeft.models.tiny.twins as twins
import vlpeft.testing
import vlpeft.testing.images
import vlpeft.testing.tiny_models
import vlpeft.testing.twins


def test_testing_reexports_the_library_objects():
    for name in vlpeft.testing.__all__:
        assert getattr(vlpeft.testing, name) is getattr(tiny, name), name
    for name in vlpeft.testing.tiny_models.__all__:
        assert getattr(vlpeft.testing.tiny_models, name) is getattr(tiny, name), name
    assert vlpeft.testing.images.random_pixel_values is tiny.random_pixel_values
    for name in vlpeft.testing.twins.__all__:
        assert getattr(vlpeft.testing.twins, name) is getattr(twins, name), name


def test_former_twin_module_paths_are_the_moved_modules():
    import vlpeft.testing.twins._qwen as old_qwen
    import vlpeft.testing.twins.base as old_base
    import vlpeft.testing.twins.sizes as old_sizes

    from vlpeft.models.tiny.twins import _qwen, base, sizes
    from vlpeft.testing.twins import smolvlm as old_smolvlm

    assert old_base is base and old_sizes is sizes and old_qwen is _qwen
    assert old_smolvlm is sys.modules["vlpeft.models.tiny.twins.smolvlm"]
    assert old_smolvlm.SPEC is twins.TWINS["smolvlm"]


def test_library_code_builds_tiny_models_without_the_test_helpers():
    script = textwrap.dedent('''
        import sys
        from vlpeft.models.tiny import FAMILIES, build_tiny_model
        from vlpeft.models.tiny.twins import TWINS, build_twin

        model, inputs = build_tiny_model("vit_bert", seed=1)
        assert model(**inputs).loss is not None
        assert "qwen2_vl" in TWINS and build_twin("qwen2_vl").model is not None
        assert "blip_vqa" in FAMILIES
        helpers = sorted(name for name in sys.modules if name.startswith("vlpeft.testing"))
        assert not helpers, helpers
        print("ok")
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")
