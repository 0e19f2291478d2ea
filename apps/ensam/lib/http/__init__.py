"""ensam's HTTP layer beside monailabel's routes: token check (:mod:`.auth`), DICOMweb proxy (:mod:`.proxy`)."""
