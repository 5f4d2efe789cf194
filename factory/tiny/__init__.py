"""Builders of tiny random-weight models of the real classes, saved in each library's own
format. The embedded demo and the tests load them through the same code as real weights."""
