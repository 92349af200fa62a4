"""Starting ranks and keeping them in hand: mpirun command lines, hosts and transports, the launch environment, and
the guards that stop every rank when the command that started it ends (cli -> plan -> launch -> ranks -> results)."""
