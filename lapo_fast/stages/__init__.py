"""The stages of LAPO, one file each."""
