/*
 * Test guest for the bzImage path: the test wraps this code in a minimal
 * bzImage (setup header + payload) so husk-vmm loads it at 1 MiB and
 * enters it at its 64-bit entry (load address + 0x200) with the zero page
 * in RSI. Prints the command line the zero page points at, a newline, and
 * resets through the i8042. Position-independent.
 */
    .code64
    .text
    .globl _start
_start:
    mov     0x228(%rsi), %esi       /* boot_params.hdr.cmd_line_ptr */
    mov     $0x3f8, %dx
1:  lodsb
    test    %al, %al
    jz      2f
    outb    %al, %dx
    jmp     1b
2:  mov     $'\n', %al
    outb    %al, %dx
    mov     $0xfe, %al
    outb    %al, $0x64
3:  hlt
    jmp     3b
