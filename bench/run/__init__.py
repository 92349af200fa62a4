"""The executors: a plan's points measured one launch each (sweep), and the collective micro-benchmark's launches
(comm). They sit above launch and ranks: they start rank programs through the launcher and read what the ranks hand
back (package order: docs/design.md "Layers")."""
