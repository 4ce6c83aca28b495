"""One module per DVC stage: ``run(cfg, tracker) -> summary`` (and ``main()`` where torchrun
launches the stage on every rank). A stage imports ``methods/`` and ``data/``, never another
stage — except scaling, which trains its grid with pretrain's run function."""
