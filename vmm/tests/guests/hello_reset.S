/*
 * Test guest: entered in 64-bit mode (husk-vmm's 64-bit boot protocol, as
 * for an ELF without a PVH note). Prints a line on COM1, then resets the
 * machine through the i8042 (command 0xfe to port 0x64).
 */
    .code64
    .text
    .globl _start
_start:
    lea     msg(%rip), %rsi
    mov     $(msg_end - msg), %ecx
    mov     $0x3f8, %dx
1:  lodsb
    outb    %al, %dx
    dec     %ecx
    jnz     1b
    mov     $0xfe, %al
    outb    %al, $0x64
2:  hlt
    jmp     2b

msg:
    .ascii  "husk guest: hello over COM1\r\n"
msg_end:
