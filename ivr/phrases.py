"""The IVR's own sentences (the wait loop, callbacks, voicemail), built in for English, German and
Spanish. A menu file may override any of them per language under `[phrases.LANG]`, and must give
all of them for a language that is not built in. `{placeholders}` are filled in by the flow.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from types import MappingProxyType

# The placeholders each phrase is given; a phrase may use any of them (or none).
PLACEHOLDERS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "invalid": frozenset(),
        "goodbye": frozenset(),
        "hold": frozenset(),
        "position": frozenset({"position"}),
        "wait_minutes": frozenset({"minutes"}),
        "wait_one_minute": frozenset(),
        "wait_under_minute": frozenset(),
        "wait_unknown": frozenset(),
        "no_agents": frozenset(),
        "callback_key": frozenset(),
        "callback_caller_id": frozenset({"number"}),
        "callback_enter": frozenset(),
        "callback_invalid": frozenset(),
        "callback_readback": frozenset({"number"}),
        "callback_confirmed": frozenset({"number"}),
        "voicemail": frozenset(),
        "voicemail_thanks": frozenset(),
        "transfer": frozenset(),
        "unavailable": frozenset(),
    }
)

BUILT_IN: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "en": {
            "invalid": "Sorry, I did not get that.",
            "goodbye": "Thank you for calling. Goodbye.",
            "hold": "Please hold, the next available agent will be with you shortly.",
            "position": "You are number {position} in line.",
            "wait_minutes": "Your estimated wait is about {minutes} minutes.",
            "wait_one_minute": "Your estimated wait is about one minute.",
            "wait_under_minute": "Your estimated wait is less than a minute.",
            "wait_unknown": "We cannot estimate your wait right now.",
            "no_agents": "All our agents are busy at the moment.",
            "callback_key": (
                "To be called back instead, without losing your place in line, "
                "press star at any time."
            ),
            "callback_caller_id": (
                "We can call you back at {number}. To confirm, press 1. To use another "
                "number, enter it now, followed by the pound key."
            ),
            "callback_enter": (
                "Please enter the number we should call you back at, followed by the pound key."
            ),
            "callback_invalid": "Sorry, that is not a valid phone number.",
            "callback_readback": (
                "You entered {number}. To confirm, press 1. To enter it again, press 2."
            ),
            "callback_confirmed": "Thank you. We will call you back at {number}. Goodbye.",
            "voicemail": (
                "Please leave your message after the tone. Press pound when you are done."
            ),
            "voicemail_thanks": "Thank you, we have your message. Goodbye.",
            "transfer": "Please hold while we transfer your call.",
            "unavailable": "Sorry, we cannot take your call right now.",
        },
        "de": {
            "invalid": "Entschuldigung, das habe ich nicht verstanden.",
            "goodbye": "Vielen Dank für Ihren Anruf. Auf Wiederhören.",
            "hold": "Bitte bleiben Sie dran, der nächste freie Mitarbeiter ist gleich für Sie da.",
            "position": "Sie sind an Position {position} in der Warteschlange.",
            "wait_minutes": "Ihre voraussichtliche Wartezeit beträgt etwa {minutes} Minuten.",
            "wait_one_minute": "Ihre voraussichtliche Wartezeit beträgt etwa eine Minute.",
            "wait_under_minute": "Ihre voraussichtliche Wartezeit beträgt weniger als eine Minute.",
            "wait_unknown": "Wir können Ihre Wartezeit gerade nicht abschätzen.",
            "no_agents": "Im Moment sind alle Mitarbeiter im Gespräch.",
            "callback_key": (
                "Wenn Sie lieber zurückgerufen werden möchten, ohne Ihren Platz zu verlieren, "
                "drücken Sie jederzeit die Sterntaste."
            ),
            "callback_caller_id": (
                "Wir können Sie unter {number} zurückrufen. Zur Bestätigung drücken Sie die 1. "
                "Für eine andere Nummer geben Sie diese jetzt ein, gefolgt von der Rautetaste."
            ),
            "callback_enter": (
                "Bitte geben Sie die Nummer für den Rückruf ein, gefolgt von der Rautetaste."
            ),
            "callback_invalid": "Entschuldigung, das ist keine gültige Telefonnummer.",
            "callback_readback": (
                "Sie haben {number} eingegeben. Zur Bestätigung drücken Sie die 1. "
                "Für eine neue Eingabe drücken Sie die 2."
            ),
            "callback_confirmed": "Danke. Wir rufen Sie unter {number} zurück. Auf Wiederhören.",
            "voicemail": (
                "Bitte hinterlassen Sie Ihre Nachricht nach dem Signalton. "
                "Drücken Sie die Rautetaste, wenn Sie fertig sind."
            ),
            "voicemail_thanks": "Danke, wir haben Ihre Nachricht erhalten. Auf Wiederhören.",
            "transfer": "Bitte bleiben Sie dran, wir verbinden Sie.",
            "unavailable": "Leider können wir Ihren Anruf gerade nicht annehmen.",
        },
        "es": {
            "invalid": "Lo siento, no le he entendido.",
            "goodbye": "Gracias por su llamada. Adiós.",
            "hold": "Por favor, espere; el próximo agente disponible le atenderá en breve.",
            "position": "Usted es el número {position} en la cola.",
            "wait_minutes": "El tiempo de espera estimado es de unos {minutes} minutos.",
            "wait_one_minute": "El tiempo de espera estimado es de un minuto.",
            "wait_under_minute": "El tiempo de espera estimado es de menos de un minuto.",
            "wait_unknown": "Ahora mismo no podemos estimar el tiempo de espera.",
            "no_agents": "En este momento todos nuestros agentes están ocupados.",
            "callback_key": (
                "Si prefiere que le devolvamos la llamada sin perder su turno, "
                "pulse la tecla asterisco en cualquier momento."
            ),
            "callback_caller_id": (
                "Podemos llamarle al {number}. Para confirmar, pulse 1. Para usar otro "
                "número, márquelo ahora seguido de la tecla almohadilla."
            ),
            "callback_enter": (
                "Marque el número al que debemos llamarle, seguido de la tecla almohadilla."
            ),
            "callback_invalid": "Lo siento, ese número de teléfono no es válido.",
            "callback_readback": (
                "Ha marcado {number}. Para confirmar, pulse 1. Para marcarlo de nuevo, pulse 2."
            ),
            "callback_confirmed": "Gracias. Le llamaremos al {number}. Adiós.",
            "voicemail": ("Deje su mensaje después de la señal. Pulse almohadilla cuando termine."),
            "voicemail_thanks": "Gracias, hemos recibido su mensaje. Adiós.",
            "transfer": "Por favor, espere mientras transferimos su llamada.",
            "unavailable": "Lo sentimos, ahora mismo no podemos atender su llamada.",
        },
    }
)


def fields_of(text: str) -> set[str]:
    """The `{placeholders}` a phrase uses; ValueError for a malformed format string."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
