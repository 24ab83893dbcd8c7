"""Trust policy on the pull path (issue #23): deny, allowed tags, cosign signatures."""
