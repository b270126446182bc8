"""The reference check against golden numbers of the published implementation (class- and text-to-image)."""
