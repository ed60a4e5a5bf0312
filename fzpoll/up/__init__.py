"""``fzpoll up`` and ``fzpoll down`` of a wg-quick style file: policy routing for a full tunnel and
``Table =`` (:mod:`.routing`, over :mod:`.rules` and :mod:`.firewall`), the PreUp/PostUp/PreDown/
PostDown hooks (:mod:`.hooks`), reloads that apply all or nothing (:mod:`.reload`), and stopping a
running ``fzpoll up`` (:mod:`.down`)."""
