"""The execution level: refusal directions found, ablated and judged as Arditi et al. (2024) do it.

Plain functions returning typed results (no Dagster): :mod:`.hooks` (directional ablation at every
layer and position, activation addition), :mod:`.candidates` (difference of means per layer and
post-instruction position), :mod:`.select` (the paper's selection with its filters and a fallback),
:mod:`.measure` (generation under ablation judged like ``refusal_behaviour``, Wilson CIs),
:mod:`.execution` (the whole procedure the ``refusal_direction`` asset runs), :mod:`.verdict`,
:mod:`.result` (the typed result, its JSON writer/reader and Markdown summary) and :mod:`.planted`.
"""
