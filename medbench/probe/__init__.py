"""Frozen-feature protocols: a backbone scored without training it (linear probe, kNN), beside fine-tuning.

The stage sits after ``train`` in the flow. It holds the numbers, not the bookkeeping:

* :mod:`medbench.probe.protocols`: the protocol names (``finetune``, ``linear``, ``knn``) and their parsing;
* :mod:`medbench.probe.features`: the frozen network's pooled features of a set of cached images (the one
  place probes read pixels, through :func:`medbench.data.loader.eval_batches`);
* :mod:`medbench.probe.linear`: L2-regularised logistic regression on standardised features, the
  regularisation chosen on the validation split (softmax for multiclass, one-vs-rest with masked missing
  labels for binary/multilabel), full-batch L-BFGS in torch (GPU when there is one);
* :mod:`medbench.probe.knn`: cosine k-nearest neighbours with DINO's temperature-weighted vote, k chosen on
  the validation split.

Where features are stored, checked and reused (the feature cache in the run store) is
:mod:`medbench.store.features`; running a probe as a run (predictions, scores, result) is
:mod:`medbench.run.runner`. Probe runs write the same per-sample predictions as fine-tuned runs, so every
scoring axis applies to them unchanged. See docs/probes.md.
"""
