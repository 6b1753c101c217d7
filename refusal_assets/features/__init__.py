"""Feature cards: what every SAE latent responds to (top-activating examples, statistics per
category x split, logit lens, refusal-direction cosine), from the stored activations, no model pass.

``scan`` streams a site's rows once through its SAE; ``lens`` reads the model's unembedding;
``site`` assembles typed cards (``cards``); ``files`` writes the asset's files; ``annotations``
holds the human labels and one-line descriptions; ``render`` turns a card into HTML or Markdown.
"""
