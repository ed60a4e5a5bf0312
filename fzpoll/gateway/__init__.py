"""The gateway half of Firezone-style DNS resources, sans-IO: the in-tunnel control protocol
(:mod:`.control`), packet rewriting (:mod:`.packet`), the NAT table (:mod:`.nat`), the gateway's
per-name state (:mod:`.gateway`) and the client's per-name state (:mod:`.client`)."""
