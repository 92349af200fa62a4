"""Starting ranks and keeping them in hand: mpirun command lines, hosts and transports, the launch environment, the
one way ranks hand their outcome back, and the guards that stop every rank when the command that started it ends.
Below the rank programs and the executors: nothing here knows what the ranks run (docs/design.md "Layers")."""
