"""Training data: EAT manifests and class folders -> items, synthetic scenes, the waveform dataset and
the resumable sampler. Import the sub-modules directly (``training.data.manifest`` etc.)."""
