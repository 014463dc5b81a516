"""Training ViSpec drafts for new targets (tooling: the plugin never imports this package, and this
package imports no demo code: whoever trains hands it the prompts).

`data`: target-generated records with teacher-forced hidden states; `train`: stage 1 (plain
EAGLE-style) and stage 2 (ViSpec, multi-step unrolling), written in the published format.
"""
