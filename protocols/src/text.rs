//! Text that comes from the guest (error messages, kernel release, agent
//! version) on its way into host logs or a terminal.

/// `text` made safe to print: at most `max` bytes (then "..."), control
/// characters (escape sequences' ESC, newlines that would forge log lines)
/// replaced by spaces.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if out.len() + c.len_utf8() > max {
            out.push_str("...");
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}
