/*
 * Test guest for graceful shutdown: polls the i8042 (interrupts stay off)
 * until the Delete make code (0x71, scan code set 2) arrives, as the VMM's
 * Ctrl-Alt-Del sends it, then says so on COM1 and resets through the i8042.
 */
    .code64
    .text
    .globl _start
_start:
    lea     waiting(%rip), %rsi
    mov     $(waiting_end - waiting), %ecx
    call    puts
poll:
    pause
    inb     $0x64, %al
    test    $1, %al                 /* output buffer full? */
    jz      poll
    inb     $0x60, %al
    cmp     $0x71, %al
    jne     poll
    lea     got(%rip), %rsi
    mov     $(got_end - got), %ecx
    call    puts
    mov     $0xfe, %al
    outb    %al, $0x64
1:  hlt
    jmp     1b

/* Writes %ecx bytes from %rsi to COM1. */
puts:
    mov     $0x3f8, %dx
2:  lodsb
    outb    %al, %dx
    dec     %ecx
    jnz     2b
    ret

waiting:
    .ascii  "waiting for ctrl-alt-del\r\n"
waiting_end:
got:
    .ascii  "got ctrl-alt-del\r\n"
got_end:
