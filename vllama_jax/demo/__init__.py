"""``make demo``: a CPU-scale end-to-end run (generated clips with sound -> frozen towers once per clip -> both
branches trained -> chat about held-out clips, with two ablations -> accuracy table, report.json, picture). Entry
point: ``python -m vllama_jax.demo`` (:mod:`vllama_jax.demo.run`)."""
