"""The executors: a plan's points measured one launch each (sweep), the collective micro-benchmark's launches
(comm), and the two-run memory demonstrations built on the sweep (demo). They sit above launch and ranks: they start
rank programs through the launcher and read what the ranks hand back (package order: docs/design.md "Layers")."""
