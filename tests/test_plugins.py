"""Methods are plug-ins: files in lit_vce/methods/ register themselves, and another package
registers through the ``lit_vce.methods`` entry-point group (here: a package on sys.path
with its dist-info, as pip would install it)."""

import sys
import textwrap

import torch

from lit_vce.registry import METHODS

PLUGIN = '''
"""A throwaway plug-in method: guidance towards the target on the one-step x0-prediction."""
import torch

from lit_vce.methods.guided import PerStepGuidance


class PluginGuidance(PerStepGuidance):
    """A plug-in guidance from outside the package."""

    def __init__(self, strength: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.strength = strength

    def guidance(self, x0, batch, classifier, eps, to_xt, step):
        logp = classifier(x0).log_softmax(1).gather(1, batch.target[:, None]).sum()
        (g,) = torch.autograd.grad(logp, x0, retain_graph=True)
        step.state["calls"] = step.state.get("calls", 0) + 1
        return to_xt(self.strength * g)
'''


def test_a_method_file_in_the_package_registers_without_editing_other_files():
    import lit_vce.methods as pkg

    init = open(pkg.__file__).read()
    assert "fastdime" not in init  # not named in __init__ ...
    assert "fastdime" in METHODS.names()  # ... and found anyway
    from lit_vce.methods.fastdime import FastDiME

    assert METHODS.get("fastdime") is FastDiME


def test_an_installed_package_registers_through_the_entry_point_group(
    tmp_path, monkeypatch, tiny_diffusion, tiny_classifier, tiny_batch, capsys
):
    (tmp_path / "lvce_plugin").mkdir()
    (tmp_path / "lvce_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "lvce_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lvce-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lit_vce.methods]\nplugin_guidance = lvce_plugin:PluginGuidance\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_entry_points_loaded", False)
    try:
        assert "plugin_guidance" in METHODS.names()
        assert METHODS.get("plugin_guidance").name == "plugin_guidance"  # the entry point's name
        method = METHODS.get("plugin_guidance")(diffusion=tiny_diffusion("ddim", 6))
        out = method.generate(tiny_batch, tiny_classifier)
        assert torch.isfinite(out.images).all() and not torch.allclose(out.images, tiny_batch.images)
        from lit_vce.cli import main

        main(["methods"])
        listing = capsys.readouterr().out
        assert "plugin_guidance  (lvce_plugin.PluginGuidance)" in listing
        assert "A plug-in guidance from outside the package." in listing and "strength=3.0" in listing
        assert "fastdime" in listing and "scales=(8.0, 10.0, 15.0)" in listing
    finally:
        METHODS._items.pop("plugin_guidance", None)
        sys.modules.pop("lvce_plugin", None)


def test_hooks_see_every_step_and_post_step_can_change_the_sample(tiny_diffusion, tiny_classifier, tiny_batch):
    from lit_vce.methods.guided import PerStepGuidance

    seen = []

    class Recording(PerStepGuidance):
        name = "recording"

        def guidance(self, x0, batch, classifier, eps, to_xt, step):
            seen.append((step.index, step.t, step.next_t, step.num_steps, tuple(step.x0.shape), id(step.state)))
            return torch.zeros_like(x0)

        def post_step(self, x_t, step, batch, state):
            return torch.zeros_like(x_t) if step.last else x_t  # the last sample is replaced: decode(0) = 0.5 grey

    m = Recording(diffusion=tiny_diffusion("ddim", 10), output="sample")
    out = m.generate(tiny_batch, tiny_classifier)
    assert [s[0] for s in seen] == list(range(5)) and seen[-1][2] is None and all(s[3] == 5 for s in seen)
    assert [s[2] for s in seen[:-1]] == [s[1] for s in seen[1:]]  # next_t is the next step's t
    assert len({s[5] for s in seen}) == 1 and seen[0][4] == (4, 3, 16, 16)  # one state per generate call
    assert torch.allclose(out.images, torch.full_like(out.images, 0.5))


def test_the_readmes_add_a_method_example_works_as_written(tiny_diffusion, tiny_classifier, tiny_batch):
    """The first code block of docs/adding-a-method.md, run verbatim: it registers, builds
    from its test arguments, steers the images and records its settings."""
    import re
    from pathlib import Path

    section = (Path(__file__).parents[1] / "docs" / "adding-a-method.md").read_text()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"__name__": "readme_example"}
    try:
        exec(compile(code, "docs/adding-a-method.md", "exec"), namespace)
        cls = METHODS.get("my_guidance")
        method = cls(diffusion=tiny_diffusion("ddim", cls.test_kwargs()["num_steps"]), scale=cls.test_kwargs()["scale"])
        out = method.generate(tiny_batch, tiny_classifier)
        assert torch.isfinite(out.images).all() and not torch.allclose(out.images, tiny_batch.images)
        d = method.describe()
        assert d["name"] == "my_guidance" and d["scale"] == 5.0 and d["diffusion"]["sampler"] == "ddim"
        from lit_vce.testing import check_method

        check = re.search(r"```python\n(from lit_vce.testing import check_method.*?)```", section, re.S).group(1)
        exec(compile(check, "docs/adding-a-method.md", "exec"), namespace)  # its contract check, as written
        assert "the same seeds give the same bytes" in check_method(cls)
    finally:
        METHODS._items.pop("my_guidance", None)
