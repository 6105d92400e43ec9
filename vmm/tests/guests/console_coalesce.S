/*
 * Test guest: writes COM1 as Linux's console does (IER cleared, the line
 * status read before each byte), then with the THR-empty interrupt on
 * (plain writes), then as the console again, and resets through the
 * i8042. Interrupts stay off: the THR interrupt is never taken.
 */
    .code64
    .text
    .globl _start
_start:
    xor     %al, %al
    call    set_ier
    lea     first(%rip), %rsi
    mov     $(first_end - first), %ecx
    call    console
    mov     $0x02, %al              /* IER: THR empty */
    call    set_ier
    lea     second(%rip), %rsi
    mov     $(second_end - second), %ecx
    mov     $0x3f8, %dx
1:  lodsb
    outb    %al, %dx
    dec     %ecx
    jnz     1b
    xor     %al, %al
    call    set_ier
    lea     third(%rip), %rsi
    mov     $(third_end - third), %ecx
    call    console
    mov     $0xfe, %al
    outb    %al, $0x64
2:  hlt
    jmp     2b

set_ier:
    mov     $0x3f9, %dx
    outb    %al, %dx
    ret

/* %ecx bytes from %rsi, each after a read of the line status. */
console:
    mov     $0x3fd, %dx
    inb     %dx, %al
    mov     $0x3f8, %dx
    lodsb
    outb    %al, %dx
    dec     %ecx
    jnz     console
    ret

first:
    .ascii  "console, coalesced\r\n"
first_end:
second:
    .ascii  "with THRI, exits\r\n"
second_end:
third:
    .ascii  "console again\r\n"
third_end:
