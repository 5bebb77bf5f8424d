"""The installed commands: ``xpnet-train`` (:mod:`.train`) and ``xpnet-bench`` (:mod:`.bench`)."""
