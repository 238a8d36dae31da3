// Keep the newest message in view while an answer streams in; Enter sends, Shift+Enter breaks.
document.addEventListener("htmx:wsAfterMessage", () => {
  const messages = document.getElementById("messages");
  if (messages) messages.scrollTop = messages.scrollHeight;
});
document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target && target.id === "composer-text" && event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    target.form.requestSubmit();
  }
});
// The socket's state on <body data-socket="open|closed">: styles can show it, tests wait on it.
document.addEventListener("htmx:wsOpen", () => { document.body.dataset.socket = "open"; });
document.addEventListener("htmx:wsClose", () => { document.body.dataset.socket = "closed"; });
