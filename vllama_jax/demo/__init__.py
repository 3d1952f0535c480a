"""``make demo``: a CPU-scale end-to-end run (generated clips -> prepare -> train the video branch -> chat about
held-out clips -> accuracy table). Entry point: ``python -m vllama_jax.demo`` (:mod:`vllama_jax.demo.run`)."""
