/*
 * Test guest: prints a line on COM1, then idles forever with interrupts
 * off, so only the VMM can end the VM (it ignores Ctrl-Alt-Del).
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
    cli
2:  hlt
    jmp     2b

msg:
    .ascii  "husk guest: spinning\r\n"
msg_end:
