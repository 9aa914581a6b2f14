"""CPU code generation pieces behind `nasc.backends.cpu_schedules`: the target's vector shape,
Relax-level lowering of blocked convs and packed matmuls, and the TIR schedule rules."""
