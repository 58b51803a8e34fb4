"""The offline demo: a pretrained tiny BLIP base, every method fine-tuned on the built-in benchmark, one table.

- :mod:`~vlpeft.demo.run`: ``vlpeft demo``, the runner shared by the settings;
- :mod:`~vlpeft.demo.setting`: the :class:`~vlpeft.demo.setting.DemoSetting` protocol the runner calls;
- :mod:`~vlpeft.demo.blip` and :mod:`~vlpeft.demo.composite`: the two settings (the BLIP base itself; the routing
  paper's frozen ViT + text model, whose ViT comes from :mod:`~vlpeft.demo.vit_export`);
- :mod:`~vlpeft.demo.specs`: what both settings share (method specs, sizes, learning rates, tasks, routing kinds);
- :mod:`~vlpeft.demo.sections` and :mod:`~vlpeft.demo.scoring`: a run's shared config sections, and training and
  scoring one run;
- :mod:`~vlpeft.demo.runlog`: ``runs.jsonl``, resuming and parallel runs;
- :mod:`~vlpeft.demo.base`: ``vlpeft pretrain``, the BLIP base.

The results table, page and plot are in :mod:`vlpeft.report`.
"""
