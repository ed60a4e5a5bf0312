"""What wg-quick does around a tunnel, for ``fzpoll up`` and ``fzpoll down``: policy routing for a
full tunnel and ``Table =`` (:mod:`.routing`), the PreUp/PostUp/PreDown/PostDown hooks
(:mod:`.hooks`), and stopping a running ``fzpoll up`` (:mod:`.down`)."""
